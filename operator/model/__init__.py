"""Kind-neutral vocabulary of the operator: what every kind's planning, status and reconciler speak."""
