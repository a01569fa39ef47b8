"""One decode step of a hybrid layer's FA and GDN heads in one launch (the split programs of both kernels in one grid)."""
