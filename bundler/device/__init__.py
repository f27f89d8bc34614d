"""Stage 4, the field: one device over SSH (deploy, status, rollback, bench) and fleets of them."""
