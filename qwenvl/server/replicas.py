"""`qwenvl serve --replicas N`: N engine replicas on Ray Serve behind one HTTP front (work in progress)."""
