"""The console: the web app over the incident store that alerts link to (`monitor console`)."""
