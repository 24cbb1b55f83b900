"""The four architectures the explainer names, each a function returning a Layer."""
