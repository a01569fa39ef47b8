"""Per-head RMSNorm of the queries and keys (Qwen3's q_norm/k_norm) in one launch: ``qk_rms_norm``."""
