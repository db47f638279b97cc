"""The dispatch base of every namespace adapter: `ServerPort`, `Sessions`, `Namespace`, `replying`."""
