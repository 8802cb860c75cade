"""Training schemes from the seed papers built on general mechanisms: several named teachers (MEAL V2, Hybrid
Distill, DistillNearest/Weighted), unlabelled samples (SSLD, DHO, KD3), a method-owned head scored at evaluation
(DHO), students trained together as peers (DML), rounds where the last student teaches the next (ISD), patch tokens
dropped inside a ViT student (DMAE, G2SD, Hybrid Distill), a teacher run only to its deepest tap (DMAE, G2SD),
auxiliary heads (BYOT, LSSKD), token slimming (SiT) and a distillation token (DeiT, DeiT-LT).  Each is registered
by importing its module (kdzoo.methods does)."""
