"""Training schemes from the seed papers built on the Distiller's general mechanisms: several named teachers
(MEAL V2), unlabelled samples (SSLD, DHO) and a method-owned head scored at evaluation (DHO)."""
