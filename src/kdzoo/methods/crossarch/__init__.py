"""Methods of the cross-architecture issue: OFA-KD and ScaleKD distil across families (CNN <-> ViT <-> MLP);
ACAM-KD, an attention-masked feature method for feature maps of one family, sits beside them because it shares
their token-aware plumbing (a ViT student's tokens are viewed as a map)."""
