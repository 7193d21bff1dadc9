"""Stage one: run the frozen backbone once over every split of a GLUE task and write the cache."""
