"""charai webhook sender: posts task events to backends, signed with Standard Webhooks."""
