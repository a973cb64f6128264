"""A discrete-event simulator of a pdmesh cluster that places requests with the router's own
placement plugins (services/router/placement), driven by a real trace or synthetic workloads."""
