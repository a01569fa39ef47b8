"""One decode step of a hybrid layer's FA and GDN heads in two launches (the FA split and GDN programs in one grid, then the FA combine and GDN finish programs)."""
