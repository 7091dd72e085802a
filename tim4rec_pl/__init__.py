"""tim4rec-pl: TiM4Rec, a time-aware SSD (Mamba-2) sequential recommender, trained with PyTorch Lightning.

Importing the package is cheap: it never imports mamba_ssm, triton, wandb or polars.
"""

__version__ = "0.1.0"
