"""The round report: the page a reviewer reads."""
