"""`make bench`: charai against BullMQ, Celery and bare floors, measured in the same run."""
