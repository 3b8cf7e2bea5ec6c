"""From anomaly maps to decisions and their quality: image scores and the output contract (``scoring``), thresholds
fitted on healthy images (``calibration``), what a calibration was fitted for (``model_record``), the one predictor
every entry point uses (``predictor``), and the metrics (``metrics``)."""
