"""The recipes that ship with clfpipe, as data: ``--recipe demo`` (or resnet34, resnext50, peer)
names one from any folder; a path names your own."""
