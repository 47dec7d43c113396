{{- define "umw.fullname" -}}
{{- if contains "umw" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}-operator
{{- else -}}
{{- printf "%s-umw-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "umw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "umw.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "umw.selectorLabels" -}}
app.kubernetes.io/name: umw-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "umw.labels" -}}
{{ include "umw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: universal-middleware
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
