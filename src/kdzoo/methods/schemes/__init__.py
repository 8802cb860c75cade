"""Training schemes from the seed papers built on general mechanisms: several named teachers (MEAL V2),
unlabelled samples (SSLD, DHO), a method-owned head scored at evaluation (DHO), students trained together as
peers (DML), rounds where the last student teaches the next (ISD), a student input of its own (DMAE's masked
patches), a teacher run only to its deepest tap (DMAE, G2SD), auxiliary heads (BYOT) and a distillation token
(DeiT, DeiT-LT)."""
