"""The Llama-family model: config, one readable model file, the safetensors and GGUF loaders."""
