"""Training ME-Net on labelled windows."""
