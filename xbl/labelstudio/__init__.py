"""Label Studio as pure data: the labeling interface, payloads, results to masks, the simulated annotator."""
