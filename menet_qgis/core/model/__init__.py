"""The network: stage table, ME-Net head, the encoder + head builder, checkpoints, input channels."""
