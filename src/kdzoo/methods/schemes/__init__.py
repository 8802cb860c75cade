"""Training schemes from the seed papers built on general mechanisms: several named teachers (MEAL V2),
unlabelled samples (SSLD, DHO), a method-owned head scored at evaluation (DHO), students trained together as
peers (DML) and rounds where the last student teaches the next (ISD)."""
