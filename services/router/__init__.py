"""The router: placement of requests on executors, and the one address clients need."""
