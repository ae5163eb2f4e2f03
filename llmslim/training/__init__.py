"""Training stages' shared machinery: losses (pure), the teacher, the accelerate loop, the student's loss."""
