"""The decoder layer's RMSNorm with the residual add before it, in one launch: ``add_rms_norm``."""
