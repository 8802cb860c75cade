"""Training schemes beyond one frozen teacher and one student (issue 12): mutual learning, rounds, ..."""
