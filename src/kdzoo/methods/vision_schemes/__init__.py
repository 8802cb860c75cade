"""Training schemes of the seed papers that need only small general mechanisms: DeiT's distillation token (with
DeiT-LT's tail re-weighting), be-your-own-teacher auxiliary heads, and masked-input feature distillation."""
