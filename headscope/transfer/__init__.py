"""The three-stage transfer pipeline (align, distill, long context) that trains a built hybrid."""
