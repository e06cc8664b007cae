"""Preprocessing stages: videos -> face crops -> landmarks -> aligned faces -> metadata JSON -> partners."""
