"""Privacy: differentially private training (DP-SGD, `dp.py`)."""
