"""The round report.

page    the page a reviewer reads: table, decision, budget and grids, as HTML and PNG
rounds  the rounds' figures as files `dvc metrics` and `dvc plots` read (metrics/)
"""
