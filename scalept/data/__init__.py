"""Reading and writing point-cloud datasets (SemanticKITTI format) and ScalePT's tile files."""
