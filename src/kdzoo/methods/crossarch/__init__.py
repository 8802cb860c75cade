"""Methods that distil across architecture families (CNN <-> ViT <-> MLP): OFA-KD, ScaleKD, ACAM-KD."""
