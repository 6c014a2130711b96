"""``sar-dist run``: one pipeline file, from Fisher statistics to the merged model (and a report)."""
