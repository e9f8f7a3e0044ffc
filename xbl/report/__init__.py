"""The round report.

page  the page a reviewer reads: table, decision, budget and grids, as HTML and PNG
"""
