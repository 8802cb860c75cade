"""Methods made for dense prediction (segmentation, detection): they read logits and features as maps."""
