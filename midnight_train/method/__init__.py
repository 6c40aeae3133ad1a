"""The method: backbone and heads, student/teacher objective, losses, schedules, augmentation."""
