"""A worker process: execution threads, a data store, a data socket for peers; and its nanny."""
