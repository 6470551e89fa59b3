"""Building blocks shared by the engines (direct Fourier reconstruction, pose search, encoders)."""
