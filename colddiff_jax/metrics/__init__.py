"""Image-quality metrics of the official evaluation (SSIM, RMSE; FID later)."""
