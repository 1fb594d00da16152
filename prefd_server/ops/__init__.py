"""Operations: health checks, the database report, maintenance and the metrics endpoint."""
