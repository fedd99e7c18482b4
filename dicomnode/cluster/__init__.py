"""The cluster: harmonisation and training jobs on Celery workers through a Redis broker."""
