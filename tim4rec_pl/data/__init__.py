"""Reading, preparing and serving interaction data."""
