//! vloop-bench: a vhost-user-blk frontend (client) and load generator.
