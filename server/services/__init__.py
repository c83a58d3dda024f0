"""Domain services, called by the handlers and by admin alike: rooms, typing,
moderation, notifications, the log stream, security alerts, admission, the admin
feed and node state."""
