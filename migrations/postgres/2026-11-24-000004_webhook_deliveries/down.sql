DROP INDEX jobs_finished;
DROP TABLE webhook_deliveries;
