"""Analysis tools: CKA layer similarity, training-free student search (DisWOT), their plots."""
