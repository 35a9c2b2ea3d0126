"""mmhops-lite: offline multimodal multi-hop retrieval-augmented reasoning on a laptop CPU."""
__version__ = "0.1.0"
