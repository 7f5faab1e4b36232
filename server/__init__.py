"""The image handler: the queue of scan jobs and its dispatch to Free scanners."""
