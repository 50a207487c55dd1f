"""Modified-backward methods: DeepLIFT (Rescale) and epsilon-LRP."""
