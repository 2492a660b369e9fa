"""Image-quality metrics of the official evaluation: SSIM and RMSE (ssim.py),
FID with the TF-FID Inception-v3 (fid.py, inception.py)."""
